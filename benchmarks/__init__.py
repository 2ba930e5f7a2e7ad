"""triogate's benchmarks: ``python -m benchmarks`` or ``triogate bench``.

Each benchmark prints its figures together with the machine it ran on and how
it was pinned, so a figure quoted in the README can be reproduced."""
