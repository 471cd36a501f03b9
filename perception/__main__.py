"""`python -m perception ...` (also what `torchrun -m perception train ...` runs)."""

from perception.cli import main

if __name__ == "__main__":
    main()
