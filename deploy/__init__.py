"""leadledger deploy."""
