"""The logo every prefect-vllm block shows in the Prefect UI."""

#: Prefect's own hosted logo for remote storage (square, 48 px): prefect-vllm has no
#: published logo of its own yet, and a block logo must be a reachable URL.
_LOGO_URL = (
    "https://cdn.sanity.io/images/3ugk85nk/production/e86b41bc0f9c99ba9489abeee83433b43d5c9365-48x48.png"
)
