import json
import os
from dataclasses import dataclass, field


@dataclass
class Item:
    sku: str
    name: str
    quantity: int = 0
    price: float = 0.0
    tags: list = field(default_factory=list)

    def total_value(self):
        return self.quantity * self.price


class Inventory:
    def __init__(self, path=None):
        self.items = {}
        self.path = path
        if path and os.path.exists(path):
            self.load(path)

    def add(self, item):
        if item.sku in self.items:
            raise KeyError(f"duplicate sku {item.sku}")
        self.items[item.sku] = item

    def remove(self, sku):
        return self.items.pop(sku)

    def restock(self, sku, amount):
        if amount <= 0:
            raise ValueError("amount must be positive")
        self.items[sku].quantity += amount

    def sell(self, sku, amount):
        item = self.items[sku]
        if item.quantity < amount:
            raise ValueError(f"only {item.quantity} of {sku} left")
        item.quantity -= amount
        return amount * item.price

    def find_by_tag(self, tag):
        return [i for i in self.items.values() if tag in i.tags]

    def low_stock(self, threshold=5):
        return sorted((i for i in self.items.values() if i.quantity < threshold), key=lambda i: i.quantity)

    def value(self):
        return sum(i.total_value() for i in self.items.values())

    def save(self, path=None):
        with open(path or self.path, "w") as f:
            json.dump([vars(i) for i in self.items.values()], f, indent=2)

    def load(self, path):
        with open(path) as f:
            for row in json.load(f):
                self.add(Item(**row))
