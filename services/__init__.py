"""The six CDP services. None imports another; they share only the `shared` package."""
