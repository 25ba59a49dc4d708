"""The repository's address: the one place to change it (README badges and notebook installs use it)."""

REPOSITORY = "https://github.com/lora-colab/lora_colab"
BRANCH = "main"


def colab_url(notebook):
    """The Open-in-Colab address of notebooks/<notebook>."""
    owner_repo = REPOSITORY.split("github.com/", 1)[1]
    return f"https://colab.research.google.com/github/{owner_repo}/blob/{BRANCH}/notebooks/{notebook}"


def colab_badge(notebook):
    """Markdown for an "Open in Colab" badge."""
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(notebook)})"


def pip_spec(extra="colab"):
    """What a Colab cell installs: the package from the repository, with an extra."""
    return f"lora_colab[{extra}] @ git+{REPOSITORY}@{BRANCH}"
