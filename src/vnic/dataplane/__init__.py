"""The only privileged code: namespaces, links, traffic control, read-back."""
