"""Where a run happens: the notebook service, its folders and Drive, the GPU, the optional
packages that import, the Hub token, and where finished files go. Imports nothing above it."""
