#!/usr/bin/env bash
# What the worker's own RabbitMQ user needs and no more: declare and bind the topology
# under its prefix (commands, rpc, dead letters, the changes exchange, the commit notices
# fanout and each worker's server-named notice queue), consume the commands and rpc queues,
# publish dead letters and changes, and reply through the default exchange (direct reply-to
# or a caller's own reply queue).
#
#   grant-worker-user.sh USER [PREFIX] [VHOST]
set -euo pipefail
user=${1:?usage: grant-worker-user.sh USER [PREFIX] [VHOST]}
prefix=${2:-plugin_state}
vhost=${3:-/}
p="${prefix//./\\.}"
objects="^${p}(\\.(commands(\\.([0-9]+|hash|unhashed))?|rpc(\\.quorum)?|dead|changes|commits))?\$|^amq\\.gen-.*"

rabbitmqctl -q set_permissions -p "$vhost" "$user" \
    "$objects" "${objects}|^amq\\.default\$" "$objects"
