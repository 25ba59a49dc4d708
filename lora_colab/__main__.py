import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while Python was still loading the command line
    print("lora-colab: interrupted; no partial output was kept", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
