"""leadledger events."""
