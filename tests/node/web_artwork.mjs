// The web page's artwork and Overlays panel in Debian's Chromium:
//   node web_artwork.mjs '<json config>'
// config: {url, handle, password, title}. The account's player already reported `title` with
// artwork through POST /ingest/plays. The page shows the device playing it with its artwork
// (a <picture> over the four sizes); "New overlay" makes an overlay whose URL the page shows;
// the overlay page shows the title and the artwork live; "Revoke" ends it, and the overlay
// page empties. Prints one JSON line.
import { chromium } from "playwright-core";

const config = JSON.parse(process.argv[2]);
const result = { steps: [] };
let browser;

async function finish(ok, reason) {
  console.log(JSON.stringify({ ok, reason, ...result }));
  if (browser) await browser.close().catch(() => {});
  process.exit(ok ? 0 : 1);
}
setTimeout(() => finish(false, `timed out after steps ${result.steps.join(", ")}`), 60000);

const loaded = (locator) => locator.evaluate((img) => img.complete && img.naturalWidth > 0);

try {
  browser = await chromium.launch({
    executablePath: config.chromium || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox"],
  });
  const page = await (await browser.newContext()).newPage();
  page.on("pageerror", (error) => { result.pageErrors = [...(result.pageErrors || []), String(error)]; });
  await page.goto(`${config.url}/?device=Laptop`);
  await page.getByLabel("Handle").fill(config.handle);
  await page.getByLabel("Password", { exact: true }).fill(config.password);
  await page.getByRole("button", { name: "Log in" }).click();
  await page.locator("#connection", { hasText: "live" }).waitFor();
  result.steps.push("signed in");

  const art = page.locator("#devices li", { hasText: config.title }).locator("img");
  await art.waitFor();
  await page.waitForFunction((el) => el.complete && el.naturalWidth > 0, await art.elementHandle());
  result.deviceArtSrcset = await page.locator("#devices li source").first().getAttribute("srcset");
  result.steps.push("device shows artwork");

  await page.getByRole("button", { name: "New overlay" }).click();
  const field = page.locator("#overlay-url");
  await page.waitForFunction(() => document.getElementById("overlay-url").value.includes("/overlay/"));
  result.overlayUrl = await field.inputValue();
  result.listed = await page.locator("#overlays li").count();
  result.steps.push("overlay made");

  const overlay = await (await browser.newContext()).newPage();
  overlay.on("pageerror", (error) => { result.pageErrors = [...(result.pageErrors || []), String(error)]; });
  await overlay.goto(result.overlayUrl);
  await overlay.locator("#title", { hasText: config.title }).waitFor();
  await overlay.waitForFunction(() => {
    const img = document.getElementById("art");
    return img.complete && img.naturalWidth > 0;
  });
  result.overlayArtist = await overlay.locator("#artist").textContent();
  result.overlayArtLoaded = await loaded(overlay.locator("#art"));
  result.steps.push("overlay shows the track");

  await page.getByRole("button", { name: /^Revoke overlay/ }).click();
  await overlay.waitForFunction(() => document.getElementById("card").className === "", null, { timeout: 10000 });
  result.listedAfter = await page.locator("#overlays li").count();
  result.steps.push("revoked");
  await finish(true);
} catch (error) {
  await finish(false, String(error));
}
