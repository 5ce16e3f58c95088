"""The one in-process model manager, model references and loaders, and the demo models."""
