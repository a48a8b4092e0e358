"""The demo's 12 classes: each a page drawer on a `Canvas`, registered with its label, share of the rows,
description and reason templates (`CLASSES`, in labels.json order)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vlmexp.demo.canvas import (
    DARK,
    GREY,
    ORANGE,
    PRODUCTS,
    RED,
    WHITE,
    Canvas,
    date,
    font,
    money,
    pick,
)


@dataclass(frozen=True)
class PageClass:
    label: str
    share: float  # share of the rows, e.g. 0.17 -> 66 of 400 train images (after 2 per class)
    description: str
    reasons: tuple[str, ...]  # str.format templates over the facts the drawer returns
    draw: Callable[[Canvas], dict]


CLASSES: list[PageClass] = []  # in labels.json order


def _cls(label: str, share: float, description: str, *reasons: str):
    def register(draw: Callable[[Canvas], dict]) -> Callable[[Canvas], dict]:
        CLASSES.append(PageClass(label, share, description, reasons, draw))
        return draw

    return register


@_cls(
    "product_photo",
    0.17,
    "A product shown as one large picture with its price and name below.",
    "One large {shape} picture fills the screen with the price {price} under it",
    "A big product image and a price tag ({price}); no form or list",
    "Mostly a single {shape} product shot, captioned '{name}'",
)
def product_photo(c: Canvas) -> dict:
    top, landscape = c.status_bar(), c.w > c.h
    colour = c.jit(c.rng.choice([(220, 50, 50), (50, 90, 220), (240, 190, 30), (150, 60, 200)]), 25)
    size = min(c.w, c.h) * c.rng.uniform(0.5, 0.68)
    x0 = c.rng.uniform(20, 40 if landscape else c.w - size - 20)
    y0 = top + c.rng.uniform(10 if landscape else 20, 30 if landscape else 50)
    shape = pick("circle|square|triangle", c.rng)
    if shape == "circle":
        c.d.ellipse((x0, y0, x0 + size, y0 + size), fill=colour)
    elif shape == "square":
        c.d.rounded_rectangle((x0, y0, x0 + size, y0 + size), radius=12, fill=colour)
    else:
        c.d.polygon([(x0 + size / 2, y0), (x0 + size, y0 + size), (x0, y0 + size)], fill=colour)
    name, price = pick(PRODUCTS, c.rng), money(c.rng)
    x, y = (x0 + size + 20, y0 + size / 3) if landscape else (18, y0 + size + 16)
    c.text((x, y), price, 24, True, RED)
    c.text((x, y + 34), name, 16)
    return {"shape": shape, "price": price, "name": name}


def _rows_page(c: Canvas, titles: str, rows: list[tuple[str, str]], action: str) -> dict:
    """order_details and invoice: the same key/value list in the same colours; only the words differ."""
    title, blue = pick(titles, c.rng), (40, 110, 220)
    y = c.header(c.status_bar(), title, blue) + c.rng.randint(12, 24)
    for key, value in rows:
        c.text((18, y), key, 15, fill=(110, 110, 110))
        c.text((c.w * 0.45, y), value, 15, fill=DARK)
        y += c.rng.randint(30, 38)
        c.d.line((14, y - 8, c.w - 14, y - 8), fill=(225, 225, 225))
    c.d.rounded_rectangle((18, y + 10, c.w - 18, y + 50), radius=8, outline=c.jit(blue), width=2)
    c.text((c.w / 2 - 50, y + 20), pick(action, c.rng), 16, True, blue)
    return {"title": title, "first": " ".join(rows[0]), "last": " ".join(rows[-1])}


@_cls(
    "order_details",
    0.165,
    "An order's details: order number, date, items and total.",
    "Title says '{title}' and the rows start with {first}",
    "Blue header '{title}' with order rows ending in {last}",
    "Key/value list of an order ({first}) under '{title}'",
)
def order_details(c: Canvas) -> dict:
    r = c.rng
    rows = [("Order No.", str(r.randint(10**9, 10**10 - 1))), ("Placed on", date(r))]
    rows += [("Items", str(r.randint(1, 6))), ("Shipping", pick("Free|$4.99", r)), ("Total", money(r))]
    return _rows_page(c, "Order details|Order info|My order", rows, "Track package|Buy again")


@_cls(
    "invoice",
    0.025,
    "An invoice: invoice number, tax ID, tax and amount.",
    "Title says '{title}' with rows {first} and {last}",
    "Invoice rows ({first}) under the header '{title}'",
    "Key/value list with a tax ID; header '{title}'",
)
def invoice(c: Canvas) -> dict:
    r = c.rng
    rows = [("Invoice No.", f"INV-{r.randint(10000, 99999)}"), ("Issued", date(r))]
    rows += [("Tax ID", str(r.randint(10**8, 10**9 - 1))), ("Tax", money(r, 1, 30)), ("Amount", money(r))]
    return _rows_page(c, "Invoice|Tax invoice|E-invoice", rows, "Download PDF|Email invoice")


def _form_page(c: Canvas, titles: str, caption: str, options: list[str], action: str) -> dict:
    """payment and refund_request: one layout and colour scheme; only the words differ."""
    title, amount, action = pick(titles, c.rng), money(c.rng), pick(action, c.rng)
    y = c.header(c.status_bar(), title, ORANGE) + c.rng.randint(18, 30)
    c.text((c.w / 2 - 60, y), caption, 16, fill=(100, 100, 100))
    c.text((c.w / 2 - 55, y + 26), amount, 32, True, DARK)
    y += c.rng.randint(80, 96)
    for i, option in enumerate(options):
        c.d.ellipse((20, y + 2, 36, y + 18), outline=ORANGE, width=2, fill=ORANGE if i == 0 else None)
        c.text((46, y), option, 15)
        y += c.rng.randint(34, 42)
    c.button((20, y + 4, c.w - 20, y + 44), action, ORANGE)
    return {"title": title, "amount": amount, "caption": caption, "action": action}


@_cls(
    "payment",
    0.065,
    "Paying for an order: the amount to pay, payment methods and a pay button.",
    "Title says '{title}', the amount field reads '{caption}' and the button '{action}'",
    "'{caption}' {amount} with payment methods and '{action}'",
    "Orange form titled '{title}' asking to pay {amount}",
)
def payment(c: Canvas) -> dict:
    methods = [f"Visa **** {c.rng.randint(1000, 9999)}", "PayPal", "Apple Pay", "Alipay"]
    options = c.rng.sample(methods, 2)
    return _form_page(
        c, "Payment|Pay order|Confirm payment", "Amount to pay", options, "Pay now|Confirm and pay"
    )


@_cls(
    "refund_request",
    0.03,
    "Asking for a refund: the refund amount, a reason and a submit button.",
    "Title says '{title}' and there is a '{caption}' field of {amount}",
    "'{caption}' {amount} and a '{action}' button",
    "Orange form titled '{title}' with a refund reason",
)
def refund_request(c: Canvas) -> dict:
    options = ["Reason: " + pick("Item damaged|Wrong size|Not as described|Late delivery", c.rng)]
    options.append("Refund to: original card")
    titles = "Refund request|Request refund|Apply for refund"
    return _form_page(c, titles, "Refund amount", options, "Submit refund|Request refund")


@_cls(
    "logistics_tracking",
    0.12,
    "Parcel tracking: a tracking number and a timeline of delivery steps.",
    "Timeline of delivery steps, latest '{status}'",
    "'{title}' page with tracking no. {number} and a step timeline",
    "Green header and a vertical timeline topped by '{status}'",
)
def logistics_tracking(c: Canvas) -> dict:
    title = pick("Tracking|Package tracking|Shipment status", c.rng)
    y = c.header(c.status_bar(), title, (40, 160, 80)) + 14
    number = f"SF{c.rng.randint(10**10, 10**11 - 1)}"
    c.text((18, y), f"Tracking No. {number}", 14, fill=(90, 90, 90))
    events = "Delivered|Out for delivery|Arrived at local hub|In transit|Shipped|Order placed".split("|")
    y += 36
    fit = (c.h - y - 20) // 48 + 1  # landscape shots hold fewer steps
    steps = events[c.rng.randint(0, 2) :][: min(fit, c.rng.randint(3, 5))]
    c.d.line((30, y + 8, 30, y + 8 + 48 * (len(steps) - 1)), fill=(180, 180, 180), width=3)
    for i, step in enumerate(steps):
        c.d.ellipse((23, y + 1, 37, y + 15), fill=(40, 160, 80) if i == 0 else (180, 180, 180))
        c.text((50, y - 2), step, 16, i == 0, DARK if i == 0 else (110, 110, 110))
        c.text((50, y + 18), f"{date(c.rng)} {c.rng.randint(8, 21)}:{c.rng.randint(10, 59)}", 12, fill=GREY)
        y += 48
    return {"title": title, "status": steps[0], "number": number}


@_cls(
    "chat_support",
    0.16,
    "A chat with customer service: speech bubbles and a message box.",
    "{bubbles} speech bubbles under a '{title}' header",
    "Chat bubbles left and right and a 'Type a message' box",
    "Header '{title}' and alternating message bubbles",
)
def chat_support(c: Canvas) -> dict:
    title = pick("Customer service|Chat with support|Live chat", c.rng)
    y = c.header(c.status_bar(), title, (20, 150, 160)) + 14
    lines = "Hi, how can I help?|Where is my order?|Let me check that.|It ships tomorrow.|Can I change size?"
    n = 0
    while n < c.rng.randint(3, 6) and y < c.h - 90:
        line, mine = pick(lines + "|Sure, done!|Thanks a lot|Anything else?", c.rng), n % 2 == 1
        tw = c.d.textlength(line, font=font(15))
        x0 = c.w - tw - 40 if mine else 16
        fill = c.jit((150, 230, 120)) if mine else c.jit((235, 235, 235))
        c.d.rounded_rectangle((x0, y, x0 + tw + 24, y + 34), radius=14, fill=fill)
        c.text((x0 + 12, y + 8), line, 15)
        y, n = y + c.rng.randint(44, 56), n + 1
    c.d.rounded_rectangle((12, c.h - 50, c.w - 12, c.h - 14), radius=16, outline=(190, 190, 190), width=2)
    c.text((26, c.h - 41), "Type a message", 14, fill=(160, 160, 160))
    return {"title": title, "bubbles": n}


@_cls(
    "search_results",
    0.10,
    "Search results: a search bar with a query above a grid of products.",
    "Search bar with '{query}' above a grid of product tiles",
    "A grid of results for the query '{query}'",
    "Query '{query}' in the search box, sort/filter row, product grid",
)
def search_results(c: Canvas) -> dict:
    top, query = c.status_bar(), pick("red shoes|phone case|lamp|tea gift box|backpack", c.rng)
    c.d.rounded_rectangle((12, top + 8, c.w - 12, top + 44), radius=18, fill=(238, 238, 238))
    c.text((30, top + 17), f"Q  {query}", 15, fill=(80, 80, 80))
    c.text((16, top + 54), "Sort   Price   Sales   Filter", 13, fill=(120, 120, 120))
    cols = 3 if c.w > c.h else 2
    cw, y = (c.w - 12 * (cols + 1)) / cols, top + 80
    for _row in range(2):
        for col in range(cols):
            x = 12 + col * (cw + 12)
            c.d.rectangle((x, y, x + cw, y + cw * 0.8), fill=c.jit((200, 200, 210), 40))
            c.text((x + 4, y + cw * 0.8 + 6), money(c.rng), 14, True, RED)
        y += cw * 0.8 + 34
    return {"query": query}


@_cls(
    "shopping_cart",
    0.075,
    "The shopping cart: item rows with checkboxes and a checkout button.",
    "'{title}' lists {items} items with checkboxes and a Checkout button",
    "Cart rows with thumbnails and a total of {total}",
    "Checkbox item rows and a bottom bar 'Total: {total}'",
)
def shopping_cart(c: Canvas) -> dict:
    n = min(c.rng.randint(2, 4), (c.h - 56 - 90) // 78)  # only rows that fit above the checkout bar
    title = pick(f"Shopping cart ({n})|My cart ({n})|Cart", c.rng)
    y = c.header(c.status_bar(), title, (70, 70, 80)) + 12
    for _ in range(n):
        c.d.rectangle((14, y + 24, 30, y + 40), outline=ORANGE, width=2)
        thumb = c.jit(c.rng.choice([(200, 80, 80), (80, 120, 200), (90, 180, 110)]), 30)
        c.d.rectangle((40, y + 6, 100, y + 66), fill=thumb)
        c.text((112, y + 12), pick(PRODUCTS, c.rng), 15)
        c.text((112, y + 40), money(c.rng), 15, True, RED)
        y += 78
    total = money(c.rng, 20, 600)
    c.d.rectangle((0, c.h - 56, c.w, c.h), fill=(248, 248, 248))
    c.text((14, c.h - 38), f"Total: {total}", 16, True)
    c.button((c.w - 150, c.h - 48, c.w - 12, c.h - 10), f"Checkout ({n})", ORANGE, 15)
    return {"title": title, "items": n, "total": total}


@_cls(
    "login",
    0.045,
    "A login screen: account and password boxes and a log-in button.",
    "Phone/email and password boxes with a '{action}' button",
    "Login form: two input boxes, '{action}', 'Forgot password?'",
    "A logo circle above account and password fields",
)
def login(c: Canvas) -> dict:
    top, purple = c.status_bar(), (120, 70, 200)
    cx, r = c.w / 2 + c.rng.randint(-20, 20), c.rng.randint(28, 40)
    logo_top = top + (12 if c.h < c.w else 40)  # landscape shots have less height to spare
    c.d.ellipse((cx - r, logo_top, cx + r, logo_top + 2 * r), fill=c.jit(purple))
    y = logo_top + 20 + 2 * r
    for placeholder in ("Phone number or email", "Password"):
        c.d.rounded_rectangle((24, y, c.w - 24, y + 42), radius=8, outline=(190, 190, 190), width=2)
        c.text((36, y + 12), placeholder, 15, fill=GREY)
        y += c.rng.randint(50, 58)
    action = pick("Log in|Sign in", c.rng)
    c.button((24, y + 8, c.w - 24, y + 52), action, purple)
    c.text((c.w / 2 - 60, y + 60), "Forgot password?", 13, fill=purple)
    return {"action": action}


@_cls(
    "优惠券",
    0.03,
    "Coupons page: a red page of discount tickets to claim.",
    "Red page '{title}' with {tickets} discount tickets like '{off}'",
    "Coupon tickets ('{off}') with Claim buttons on red",
    "'{title}': tickets showing '{off}' and a minimum spend",
)
def coupons(c: Canvas) -> dict:
    c.d.rectangle((0, 0, c.w, c.h), fill=c.jit((225, 45, 45)))
    top, title = c.status_bar(), pick("My coupons|Coupon center|Get coupons", c.rng)
    c.text((18, top + 12), title, 22, True, WHITE)
    y, n, offs, cut = top + 56, 0, [], c.w * 0.42
    while y + 80 < c.h - 10 and n < 4:
        offs.append(f"${pick('3|5|10|20|50', c.rng)} OFF")
        c.d.rounded_rectangle((16, y, c.w - 16, y + 72), radius=10, fill=c.jit((255, 245, 225), 8))
        c.d.line((cut, y + 8, cut, y + 64), fill=(225, 45, 45), width=2)
        c.text((28, y + 22), offs[-1], 20, True, (225, 45, 45))
        c.text((cut + 12, y + 12), f"Min. spend ${pick('20|30|59|99', c.rng)}", 13, fill=(90, 90, 90))
        c.text((cut + 12, y + 40), "Claim", 15, True, (225, 45, 45))
        y, n = y + c.rng.randint(84, 96), n + 1
    return {"title": title, "tickets": n, "off": offs[0]}


@_cls(
    "account_settings",
    0.015,
    "Account settings: rows of options with on/off switches.",
    "'{title}' page with rows of on/off switches",
    "Toggle switches next to option names under '{title}'",
    "A list of settings, each with a switch",
)
def account_settings(c: Canvas) -> dict:
    title = pick("Settings|Account settings", c.rng)
    y = c.header(c.status_bar(), title, (110, 110, 120)) + 10
    options = "Notifications|Dark mode|Location access|Personalised ads|Auto-play videos".split("|")
    for name in c.rng.sample(options, 4):
        on, x = c.rng.random() < 0.5, c.w - 66
        c.text((18, y + 12), name, 15)
        c.d.rounded_rectangle((x, y + 8, x + 46, y + 32), radius=12, fill=(60, 190, 90) if on else (200,) * 3)
        c.d.ellipse((x + (24 if on else 2), y + 10, x + (44 if on else 22), y + 30), fill=WHITE)
        y += 46
        c.d.line((14, y, c.w - 14, y), fill=(225, 225, 225))
    return {"title": title}
