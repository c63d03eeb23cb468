"""The file formats the package writes and reads, each named in one place: an exported model folder and a run folder."""
