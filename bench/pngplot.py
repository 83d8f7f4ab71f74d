"""A tiny pure-Python line chart written as PNG (matplotlib is not a dependency of this project).

Enough for the benchmark's one plot: several series of (x, y) points, linear x, linear or log y, a
legend, tick labels in a 5x7 bitmap font (digits, capitals and a little punctuation).
"""
from __future__ import annotations

import math
import struct
import zlib

# 5x7 glyphs, one string of 7 rows of 5 bits per character ('#' = ink)
_FONT_ROWS = {
    "0": [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."],
    "1": ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."],
    "2": [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"],
    "3": ["####.", "....#", "....#", ".###.", "....#", "....#", "####."],
    "4": ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."],
    "5": ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."],
    "6": [".###.", "#....", "#....", "####.", "#...#", "#...#", ".###."],
    "7": ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."],
    "8": [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."],
    "9": [".###.", "#...#", "#...#", ".####", "....#", "....#", ".###."],
    "A": [".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"],
    "B": ["####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."],
    "C": [".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."],
    "D": ["####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."],
    "E": ["#####", "#....", "#....", "####.", "#....", "#....", "#####"],
    "F": ["#####", "#....", "#....", "####.", "#....", "#....", "#...."],
    "G": [".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".###."],
    "H": ["#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"],
    "I": [".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."],
    "K": ["#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"],
    "L": ["#....", "#....", "#....", "#....", "#....", "#....", "#####"],
    "M": ["#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"],
    "N": ["#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#", "#...#"],
    "O": [".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."],
    "P": ["####.", "#...#", "#...#", "####.", "#....", "#....", "#...."],
    "R": ["####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"],
    "S": [".####", "#....", "#....", ".###.", "....#", "....#", "####."],
    "T": ["#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."],
    "U": ["#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."],
    "V": ["#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."],
    "W": ["#...#", "#...#", "#...#", "#.#.#", "#.#.#", "##.##", "#...#"],
    "X": ["#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"],
    "Y": ["#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."],
    ".": [".....", ".....", ".....", ".....", ".....", ".##..", ".##.."],
    "-": [".....", ".....", ".....", "#####", ".....", ".....", "....."],
    "/": ["....#", "....#", "...#.", "..#..", ".#...", "#....", "#...."],
    "(": ["...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."],
    ")": [".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."],
    " ": ["....."] * 7,
}

COLOURS = [(31, 119, 180), (174, 199, 232), (214, 39, 40), (255, 152, 150), (44, 160, 44), (148, 103, 189)]


class Canvas:
    def __init__(self, width: int, height: int, background=(255, 255, 255)):
        self.width, self.height = width, height
        self.pixels = [bytearray(bytes(background) * width) for _ in range(height)]

    def set(self, x: int, y: int, colour) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            self.pixels[y][3 * x:3 * x + 3] = bytes(colour)

    def rect(self, x0, y0, x1, y1, colour) -> None:
        for y in range(max(0, y0), min(self.height, y1 + 1)):
            for x in range(max(0, x0), min(self.width, x1 + 1)):
                self.pixels[y][3 * x:3 * x + 3] = bytes(colour)

    def line(self, x0, y0, x1, y1, colour, thickness: int = 1) -> None:
        x0, y0, x1, y1 = int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        half = thickness // 2
        while True:
            if thickness > 1:
                self.rect(x0 - half, y0 - half, x0 + half, y0 + half, colour)
            else:
                self.set(x0, y0, colour)
            if x0 == x1 and y0 == y1:
                break
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, text: str, colour=(0, 0, 0), scale: int = 1) -> None:
        for i, char in enumerate(text.upper()):
            rows = _FONT_ROWS.get(char, _FONT_ROWS[" "])
            for row, bits in enumerate(rows):
                for col, bit in enumerate(bits):
                    if bit == "#":
                        px, py = x + (i * 6 + col) * scale, y + row * scale
                        self.rect(px, py, px + scale - 1, py + scale - 1, colour)

    @staticmethod
    def text_width(text: str, scale: int = 1) -> int:
        return len(text) * 6 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(row) for row in self.pixels)

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                + chunk(b"IEND", b""))


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    span = max(high - low, 1e-9)
    step = 10 ** math.floor(math.log10(span / count))
    for factor in (1, 2, 5, 10):
        if span / (step * factor) <= count:
            step *= factor
            break
    start = math.floor(low / step) * step
    ticks, value = [], start
    while value <= high + step * 1e-6:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _label(value: float) -> str:
    if value == int(value):
        return str(int(value))
    return f"{value:g}"


def line_chart(path: str, series: dict[str, list[tuple[float, float]]], title: str = "", x_label: str = "",
               y_label: str = "", log_y: bool = False, width: int = 800, height: int = 500) -> None:
    """Write a PNG line chart of ``series`` (name -> [(x, y), ...]) to ``path``."""
    canvas = Canvas(width, height)
    left, right, top, bottom = 70, width - 20, 40, height - 60
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points if not log_y or y > 0]
    x_ticks = _nice_ticks(0, max(xs) if xs else 1)
    x_max = x_ticks[-1] or 1
    if log_y:
        y_lo = math.floor(math.log10(min(ys))) if ys else 0
        y_hi = math.ceil(math.log10(max(ys))) if ys else 1
        y_hi = max(y_hi, y_lo + 1)
        y_ticks = [10.0 ** e for e in range(y_lo, y_hi + 1)]

        def ty(y):
            return bottom - (math.log10(y) - y_lo) / (y_hi - y_lo) * (bottom - top)
    else:
        y_ticks = _nice_ticks(0, max(ys) if ys else 1)
        y_max = y_ticks[-1] or 1

        def ty(y):
            return bottom - y / y_max * (bottom - top)

    def tx(x):
        return left + x / x_max * (right - left)

    grey, black = (220, 220, 220), (0, 0, 0)
    for value in x_ticks:
        canvas.line(tx(value), top, tx(value), bottom, grey)
        label = _label(value)
        canvas.text(int(tx(value)) - Canvas.text_width(label) // 2, bottom + 8, label)
    for value in y_ticks:
        canvas.line(left, ty(value), right, ty(value), grey)
        label = _label(value)
        canvas.text(left - 8 - Canvas.text_width(label), int(ty(value)) - 3, label)
    canvas.line(left, top, left, bottom, black)
    canvas.line(left, bottom, right, bottom, black)
    canvas.text((left + right - Canvas.text_width(title, 2)) // 2, 10, title, scale=2)
    canvas.text((left + right - Canvas.text_width(x_label)) // 2, bottom + 30, x_label)
    canvas.text(5, top - 14, y_label)
    for i, (name, points) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pixels = [(tx(x), ty(y)) for x, y in points if not log_y or y > 0]
        for (x0, y0), (x1, y1) in zip(pixels, pixels[1:]):
            canvas.line(x0, y0, x1, y1, colour, thickness=3)
        for x, y in pixels:
            canvas.rect(int(x) - 3, int(y) - 3, int(x) + 3, int(y) + 3, colour)
        canvas.rect(left + 12, top + 8 + i * 14, left + 24, top + 14 + i * 14, colour)
        canvas.text(left + 30, top + 7 + i * 14, name)
    with open(path, "wb") as f:
        f.write(canvas.png())
