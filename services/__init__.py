"""leadledger services."""
