"""leadledger tests."""
