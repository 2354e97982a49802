"""``python -m client.predict``: ``fl-predict``."""

from client.predict.cli import main

main()
