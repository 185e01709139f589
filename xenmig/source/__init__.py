"""The source side of a migration: the client API, its phases and the stream senders."""
