"""The training data: image files and their checks, captions and prompts per image, the dataset,
aspect-ratio buckets and the batch samplers."""
