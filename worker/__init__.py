"""The plugin state worker: RabbitMQ state commands applied to Postgres, reads over RPC."""
