from kdpipe.cli import main

# Guarded: vLLM's worker processes are spawned and import the main module again.
if __name__ == "__main__":
    main()
