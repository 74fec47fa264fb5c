#!/usr/bin/env bash
# What the worker's own RabbitMQ user needs and no more: declare and bind the topology
# under its prefix, consume the commands and rpc queues, publish dead letters, and reply
# through the default exchange (direct reply-to).
#
#   grant-worker-user.sh USER [PREFIX] [VHOST]
set -euo pipefail
user=${1:?usage: grant-worker-user.sh USER [PREFIX] [VHOST]}
prefix=${2:-plugin_state}
vhost=${3:-/}
p="${prefix//./\\.}"
objects="^${p}(\\.(commands|rpc|dead))?\$"

rabbitmqctl -q set_permissions -p "$vhost" "$user" \
    "$objects" "${objects}|^amq\\.default\$" "$objects"
