"""All file reading and writing lives in this package."""
