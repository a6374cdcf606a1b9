"""The feedback store: predictions from Kafka, corrections, and the review queue."""
