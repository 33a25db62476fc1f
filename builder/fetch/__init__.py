"""Stage 3, fetch: every input from outside (sources, SDKs, .debs, bases, wheels), checked against its pin."""
