"""The explorer's compute (`explorer`) and its checkpoint loading (`loading`); the panel app is explorer.py."""
