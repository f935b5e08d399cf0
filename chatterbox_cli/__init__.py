"""chatterbox-cli: Resemble AI's Chatterbox text-to-speech on small GPUs and CPUs."""

__version__ = "0.1.0"
