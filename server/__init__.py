"""Command line and HTTP front end of cosmos3-serve."""
