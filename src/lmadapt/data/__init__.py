"""Data: read files into records, validate, tokenize, batch. Import each module by its dotted
name: the package itself imports nothing, so reading a file never loads torch (`batching` does)."""
