"""Models: loading through from_pretrained with fingerprints (loading), and export as HF safetensors (export)."""
