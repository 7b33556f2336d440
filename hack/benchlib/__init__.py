"""hack/bench: one CRI client that measures flatpod and containerd side by side."""
