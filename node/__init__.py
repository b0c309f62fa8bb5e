"""ainode: a chest-CT AI node between the PACS and its AI models.

Data flow: receive (dimse.scp) -> store (storage) -> record (catalog) -> complete (completion).
"""

__version__ = "0.1.0"
