"""Small programs the tests run as processes of their own, as separate plugins' workers
would run the client."""
