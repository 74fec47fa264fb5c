#!/usr/bin/env bash
# Least privilege for one plugin's RabbitMQ user: it may publish to the state exchange only
# with the routing keys cmd.<its plugin id> and rpc.<its plugin id>; it may have queues of its
# own, named <prefix>.reply.<its plugin id>.<name> (replies, a change feed), and bind one to
# the changes exchange only with chg.<its plugin id>. Direct reply-to needs no permission.
#
#   grant-plugin-user.sh USER PLUGIN_ID [PREFIX] [VHOST]
#
# Create the user first (rabbitmqctl add_user USER PASSWORD) and map it to the plugin
# (plugin-state-worker plugins add --key KEY --amqp-user USER).
set -euo pipefail
user=${1:?usage: grant-plugin-user.sh USER PLUGIN_ID [PREFIX] [VHOST]}
plugin=${2:?usage: grant-plugin-user.sh USER PLUGIN_ID [PREFIX] [VHOST]}
prefix=${3:-plugin_state}
vhost=${4:-/}
# Dots in the prefix are literal in the patterns.
p="${prefix//./\\.}"
plugin_re="${plugin//./\\.}"
own="^${p}\\.reply\\.${plugin_re}\\..+\$"

rabbitmqctl -q set_permissions -p "$vhost" "$user" \
    "$own" "^${p}\$|${own}" "${own}|^${p}\\.changes\$"
rabbitmqctl -q set_topic_permissions -p "$vhost" "$user" "$prefix" \
    "^(cmd|rpc)\\.${plugin_re}\$" '^$'
rabbitmqctl -q set_topic_permissions -p "$vhost" "$user" "${prefix}.changes" \
    '^$' "^chg\\.${plugin_re}\$"
