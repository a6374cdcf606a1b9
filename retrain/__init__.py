"""Training, evaluation and the retrain loop that turns feedback into better models."""
