"""Context-manager support shared by everything that holds open files."""


class Closeable:
    """`with obj:` closes `obj` on the way out; subclasses define close()."""

    def close(self):
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
