// Two tabs of one browser (one profile, shared localStorage) through several access-token
// refreshes: refresh tokens rotate and reusing a spent one ends the login, so the tabs must
// not both spend the same one.
//   node web_tabs.mjs '<json config>'   config: {url, handle, password, waitMs}
// Prints one JSON line; exits 0 when both tabs are still signed in and live afterwards.
import { chromium } from "playwright-core";

const config = JSON.parse(process.argv[2]);
const result = { steps: [] };
let browser;

async function finish(ok, reason) {
  console.log(JSON.stringify({ ok, reason, ...result }));
  if (browser) await browser.close().catch(() => {});
  process.exit(ok ? 0 : 1);
}
setTimeout(() => finish(false, `timed out after steps ${result.steps.join(", ")}`), config.waitMs + 40000);

try {
  browser = await chromium.launch({ executablePath: "/usr/bin/chromium", headless: true, args: ["--no-sandbox"] });
  const context = await browser.newContext();
  const first = await context.newPage();
  await first.goto(`${config.url}/`);
  await first.getByLabel("Handle").fill(config.handle);
  await first.getByLabel("Password", { exact: true }).fill(config.password);
  await first.getByRole("button", { name: "Log in" }).click();
  await first.locator("#connection", { hasText: "live" }).waitFor();
  const second = await context.newPage();
  await second.goto(`${config.url}/`);
  await second.locator("#connection", { hasText: "live" }).waitFor();
  result.steps.push("two tabs signed in");

  const refreshes = [];
  context.on("response", (response) => {
    if (response.url().endsWith("/auth/refresh")) refreshes.push(response.status());
  });
  await first.waitForTimeout(config.waitMs);
  result.refreshes = refreshes;
  if (refreshes.length < 2) throw new Error(`only ${refreshes.length} refreshes happened`);
  if (refreshes.some((status) => status !== 200)) throw new Error(`a refresh failed: ${refreshes}`);
  result.steps.push("tokens refreshed several times, every refresh accepted");

  // Both tabs still work: an edit in one shows in the other.
  for (const page of [first, second]) {
    if (!(await page.locator("#login").isHidden())) throw new Error("a tab was signed out");
  }
  await second.getByLabel("Search").fill("Harbour Lights");
  await second.getByRole("button", { name: "Add Harbour Lights to the queue" }).click();
  await first.locator("#now-track", { hasText: "Harbour Lights" }).waitFor();
  result.steps.push("both tabs still signed in and in step");
  await finish(true);
} catch (error) {
  await finish(false, String(error));
}
