"""What the scripts share and nothing below them imports: the parser and exit handling, the
flag groups, terminal tables."""
