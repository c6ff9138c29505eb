"""How long each console page takes to load in headless chromium: from navigation start to the
load event, the median and the worst of `--rounds` loads, after logging in with `--token`.

Usage: python bench/console_load.py --base http://127.0.0.1:8080 --token "$(cat admin-token)"
(bench/console.sh starts a demo and runs it with the test virtualenv's selenium).
"""

from __future__ import annotations

import argparse
import shutil
import statistics

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

PAGES = [
    "/console",
    "/console/rigs",
    "/console/models",
    "/console/keys",
    "/console/plugins",
    "/console/usage",
    "/console/rewards",
    "/console/batches",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    options = Options()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(args.base + "/console/login")
        driver.find_element(By.ID, "token").send_keys(args.token)
        driver.find_element(By.CSS_SELECTOR, "form button").click()
        print("| page | median load (ms) | worst (ms) |")
        print("| --- | --: | --: |")
        for page in PAGES:
            times = []
            for _ in range(args.rounds):
                driver.get(args.base + page)
                times.append(driver.execute_script(
                    "const n = performance.getEntriesByType('navigation')[0];"
                    "return n.loadEventEnd - n.startTime;"
                ))
            print(f"| `{page}` | {statistics.median(times):.0f} | {max(times):.0f} |")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
