"""List the backbone registry (name, family, source, local weights, feature layers)."""
def main():
    pass
