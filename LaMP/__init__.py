"""LaMP: retrieval-augmented personalization of language models, with PEFT fine-tuning."""
