"""VAR (FoundationVision/VAR): class-conditional next-scale prediction on ImageNet (d16-d30 at 256 px, d36 at 512 px)."""
