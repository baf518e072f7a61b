"""Identity: stitches the identities seen together in records into one graph per person
and gives each graph a stable profile id."""
