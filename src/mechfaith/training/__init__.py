"""Training sparse coders on any stream of (input, target) batches."""
