"""leadledger projections."""
