"""Model code: the reasoner plugin for vLLM, the generator executor, checkpoint handling."""
