"""FFNs: finding them in a model (`discover`), splitting their neurons into experts (`split`), and the
PrunePath FFN that replaces each one (`module`)."""
