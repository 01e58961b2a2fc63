"""Source readers: each turns one kind of source into a QuantizedModel."""
