"""HTTP service: OpenAI-compatible and native routes over models with approximate MLPs."""
