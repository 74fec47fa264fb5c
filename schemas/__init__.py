"""The wire contract of plugin state over AMQP: structs, codecs, error codes, schema export."""
