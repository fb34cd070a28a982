"""Adding a confirmed image to a known-image bank from the console (``MODERATOR_CONSOLE_BANKS``).

The reviewer picks one of the banks the deployment offers; the console hashes the image it already
serves (the original bytes, decoded with the worker's limits) and publishes a PDQ entry to the banks
topic, keyed ``<bank>/<event id>``, so every worker matches re-uploads within a poll interval. The
console runs no model: for an entry with the image's CLIP embedding too, use ``moderator bank add
NAME --from-verdicts`` (it reads the embedding from the embeddings log).
"""

from __future__ import annotations

from moderator.app import App
from moderator.banks.entries import LowQuality, from_image
from moderator.console.feeds import ConsoleFeeds
from moderator.console.images import ImageUnavailable, ReviewImages
from moderator.errors import ReasonError
from moderator.events import BankEntry, ReviewItem
from moderator.images import ImageLimits


class BankRefused(Exception):
    """The image cannot be added; the message says why (for the page)."""


class ConsoleBanks:
    def __init__(self, app: App, images: ReviewImages, feeds: ConsoleFeeds) -> None:
        self.names = tuple(app.settings.console_banks)
        self.topic = app.settings.topic("banks")
        self.limits = ImageLimits.from_settings(app.settings)
        self.images = images
        self.feeds = feeds

    def add(self, item: ReviewItem, bank: str, reviewer: str, label: str) -> BankEntry:
        if bank not in self.names:
            raise BankRefused(f"{bank!r} is not a bank reviewers may add to (MODERATOR_CONSOLE_BANKS)")
        try:
            data = self.images.original(item)
            entry = from_image(bank, data, limits=self.limits, engine=None, spec=None,
                               source=f"console:{item.event_id}", added_by=reviewer, label=label[:500],
                               entry_id=item.event_id)  # fmt: skip
        except (ImageUnavailable, ReasonError) as exc:
            raise BankRefused(f"the image cannot be hashed: {exc}") from None
        except LowQuality:
            raise BankRefused("the image is too flat for a PDQ hash to mean anything (quality below 50): add it "
                              f"by embedding with `moderator bank add {bank} --from-verdicts`") from None  # fmt: skip
        self.feeds.publish_bank_entry(self.topic, entry)
        return entry
