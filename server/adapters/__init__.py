"""What an adapter is: PEFT config parsing, checkpoint reading and validation, archives, the registry (torch-free
except reading weights)."""
