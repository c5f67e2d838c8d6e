"""danube: pretrain, chat-fine-tune and evaluate small Llama/Mistral-style LLMs."""

__version__ = "0.1.0"
